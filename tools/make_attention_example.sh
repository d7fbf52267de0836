#!/usr/bin/env bash
# Makes docs/attention_example.png: what a CIFAR-10 ViT attends to, for two test images.
#
#   tools/make_attention_example.sh [WORKDIR]
#
# WORKDIR is a run of configs/cifar10.py:short (default /tmp/c10short2, trained to step 1700 with
#   TFDS_DATA_DIR=../shared/data/tfds .venv/bin/python train.py \
#       --config=configs/cifar10.py:short --workdir=/tmp/c10short2
# ). Writes CIFAR-10 test images as PNG, runs `vit attention` on them, and puts each image's
# picture, rollout overlay and per-layer grid side by side in one PNG.
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${1:-/tmp/c10short2}
DATA_DIR=${TFDS_DATA_DIR:-$(cd .. && pwd)/shared/data/tfds}
INDICES=${INDICES:-"4 16"}  # a horse and a bird in the CIFAR-10 test split (TFDS order)
export TF_CPP_MIN_LOG_LEVEL=2  # TensorFlow only reads the data here
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

.venv/bin/python tools/write_cifar10_test_images.py "$DATA_DIR" "$OUT/images" $INDICES

.venv/bin/vit attention --checkpoint "$CKPT" "$OUT"/images/*.png --out "$OUT/attention"
.venv/bin/vit predict --checkpoint "$CKPT" "$OUT"/images --top-k 1 --json "$OUT/preds.json"

.venv/bin/python - "$OUT" docs/attention_example.png <<'PY'
import glob, json, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.image as mpimg
import matplotlib.pyplot as plt

out, target = sys.argv[1], sys.argv[2]
preds = {os.path.basename(p["file"]): p["top_k"][0]
         for p in json.load(open(f"{out}/preds.json"))["predictions"]}
stems = sorted(os.path.basename(f)[:-len("_image.png")]
               for f in glob.glob(f"{out}/attention/*_image.png"))
fig, axes = plt.subplots(len(stems), 3, figsize=(9.6, 3.6 * len(stems)), dpi=100,
                         gridspec_kw={"width_ratios": [1, 1, 1.2]}, squeeze=False)
for row, stem in zip(axes, stems):
    label = stem.split("_", 1)[1]
    name, prob = preds[f"{stem}.png"]
    panels = [("image", f"{label} (predicted {name} {prob:.2f})"),
              ("rollout", "attention rollout"),
              ("layers", "class-token attention per layer")]
    for ax, (suffix, title) in zip(row, panels):
        ax.imshow(mpimg.imread(f"{out}/attention/{stem}_{suffix}.png"))
        ax.set_title(title, fontsize=10)
        ax.axis("off")
fig.tight_layout()
fig.savefig(target, dpi=100)
print(f"wrote {target}: {os.path.getsize(target) // 1024} KB")
PY
