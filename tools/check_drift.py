"""Fail when `nbdev_clean` or `nbdev_export` would change a tracked file: the notebooks must be clean and the
package must be exactly what the notebooks export. Runs both tools in place and reports what they changed."""
import hashlib, subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
bin_dir = Path(sys.executable).parent

def snapshot():
    files = [*root.glob("nbs/**/*.ipynb"), *root.glob("ssl_nb/**/*.py"), root / "pyproject.toml"]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}

before = snapshot()
for tool in ("nbdev_clean", "nbdev_export"):
    subprocess.run([str(bin_dir / tool)], cwd=root, check=True)
after = snapshot()
changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
if changed:
    print("Export/clean drift: nbdev_clean + nbdev_export changed these files (now updated in place):")
    print("\n".join(f"  {c}" for c in changed))
    print("Review and commit them: notebooks are the source of truth and ssl_nb/ must match them.")
    sys.exit(1)
print("nbdev drift check: notebooks clean, package in sync.")
