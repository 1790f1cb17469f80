"""Drop-ins for other libraries' loss call signatures, backed by kdfast's fused kernels.

kdfast.integrations.trl: TRL's GKDTrainer.generalized_jsd_loss. The modules import nothing of the
library they serve: they match its signature and semantics, so that library stays optional.
"""
