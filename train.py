"""Train a ViT: python train.py --config=configs/cifar10.py:Ti/4 --workdir=runs/c10."""

if __name__ == "__main__":
    import signal

    # Importing JAX and TensorFlow takes seconds: a SIGTERM meanwhile is kept and answered as
    # one later in start-up is (exit 75, one line), not by the default handler's silent exit.
    sigterms: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: sigterms.append(signum))
    from vit.train_cli import main

    main(sigterms_before=sigterms)
