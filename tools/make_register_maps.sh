#!/usr/bin/env bash
# Makes docs/registers_attention.png: attention rollout of two CIFAR-10 models side by side, one
# trained without and one with register tokens, on the same test images.
#
#   tools/make_register_maps.sh WORKDIR_WITHOUT WORKDIR_WITH
#
# The workdirs are runs of tools/cifar10_ablation.py (--base short-proxy, rows base and
# registers_4). Writes the test images as PNG, runs `vit attention` with each checkpoint, and
# puts image | rollout without | rollout with registers in one row per image.
set -euo pipefail
cd "$(dirname "$0")/.."
WITHOUT=$1
WITH=$2
DATA_DIR=${TFDS_DATA_DIR:-$(cd .. && pwd)/shared/data/tfds}
INDICES=${INDICES:-"4 16 21"}
export TF_CPP_MIN_LOG_LEVEL=2
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

.venv/bin/python tools/write_cifar10_test_images.py "$DATA_DIR" "$OUT/images" $INDICES

.venv/bin/vit attention --checkpoint "$WITHOUT" "$OUT"/images/*.png --out "$OUT/without"
.venv/bin/vit attention --checkpoint "$WITH" "$OUT"/images/*.png --out "$OUT/with"

.venv/bin/python - "$OUT" docs/registers_attention.png <<'PY'
import glob, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.image as mpimg
import matplotlib.pyplot as plt

out, target = sys.argv[1], sys.argv[2]
stems = sorted(os.path.basename(f)[:-len("_image.png")]
               for f in glob.glob(f"{out}/without/*_image.png"))
fig, axes = plt.subplots(len(stems), 3, figsize=(7.5, 2.6 * len(stems)), dpi=100,
                         squeeze=False)
for row, stem in zip(axes, stems):
    panels = [(f"{out}/without/{stem}_image.png", stem.split("_", 1)[1]),
              (f"{out}/without/{stem}_rollout.png", "rollout, no registers"),
              (f"{out}/with/{stem}_rollout.png", "rollout, 4 registers")]
    for ax, (path, title) in zip(row, panels):
        ax.imshow(mpimg.imread(path))
        ax.set_title(title, fontsize=10)
        ax.axis("off")
fig.tight_layout()
fig.savefig(target, dpi=100)
print(f"wrote {target}: {os.path.getsize(target) // 1024} KB")
PY
