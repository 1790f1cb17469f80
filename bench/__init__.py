"""kdfast microbenchmarks: `python -m bench` (see bench/__main__.py for the options).

Layout, after Liger-Kernel's benchmark/scripts + utils:
  harness.py       the shared part: timing, statistics, memory, guards, machine info, table, JSON
  memory_probe.py  peak CPU memory of one (case, contender) in a fresh process
  kl.py            response losses: temperature softmax-KL / KD loss
  divergence.py    the LLM divergences: TRL's generalized JSD, reverse KL
  relation.py      RKD distance + angle
  feature.py       logit MSE, cosine, feature L2
  plots.py         PNGs: KL against vocabulary size, RKD against N, the divergence cases

Each family module exposes cases(settings, device), make_inputs(case) and contenders(case,
settings), so a case can be rebuilt from its plain description in another process.
"""
