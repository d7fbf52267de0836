"""Train a ViT: python train.py --config=configs/cifar10.py:Ti/4 --workdir=runs/c10."""

from vit.train_cli import main

if __name__ == "__main__":
    main()
