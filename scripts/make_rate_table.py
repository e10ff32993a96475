"""Regenerate assets/rate_table.json (α ↔ payload rate ↔ SNR on iid N(0,1), per lattice)."""
import json
import os
import sys

from hq_diffusion.codec.rate import build_rate_table

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "rate_table.json")
if __name__ == "__main__":
    table = build_rate_table()
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    os.replace(tmp, out)
    print(f"wrote {os.path.normpath(out)}", file=sys.stderr)
