"""`python -m kdfast` prints the build information."""
import json

import kdfast

if __name__ == "__main__":
    print(json.dumps(kdfast.build_info(), indent=2))
