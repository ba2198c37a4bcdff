"""`vstream bench encode` as a script: same options (--preset, --device, --json, ...); see vstream/bench.py.

Usage: PYTHONPATH=. python benchmarks/encode.py --preset flash-vstream-7b --device cuda --json
"""

import sys

from vstream.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ["bench", "encode"]
    main()
