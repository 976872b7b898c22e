"""The pruning sweep on several workers with ``tf.distribute.MultiWorkerMirroredStrategy``.

Run it on one machine, with the workers on 127.0.0.1:

    python examples/multi_worker_sweep.py --workers 2

The launcher trains a small MNIST BadNet (the data and trigger of
examples/multi_worker_fine_pruning.py), saves it, and starts ``--workers``
processes, each with its own ``TF_CONFIG`` built from the arguments (the
cluster on free ports of 127.0.0.1, the worker's index). Every worker loads
the BadNet and calls ``prune_to_threshold(..., strategy=strategy)`` on
``conv_last``: it evaluates its rows of every batch, and the channel sums and
the per-level counts of all workers are added with ``strategy.reduce``.
Worker 0 prints the table. Each worker saves its table and masks; the
launcher then sweeps on one device and says whether every worker's table
equals it.

On a real cluster, start the same script with ``--worker`` on every machine
and set ``TF_CONFIG`` yourself (see the TensorFlow multi-worker guide);
``sweep`` is the part each worker runs, for any strategy.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from multi_worker_fine_pruning import _data, free_ports  # noqa: E402  (the sibling example)

LAYER = "conv_last"


def _sets(args):
    """The clean validation set and the poisoned one, ``--examples`` of each at most."""
    _, clean, _, poisoned, trigger = _data(args.seed)
    return ((clean[0][:args.examples], clean[1][:args.examples]),
            (poisoned[0][:args.examples], poisoned[1][:args.examples]), trigger)


def sweep(model, clean, poisoned, max_accuracy_drop, strategy=None):
    """One worker's job: the sweep of ``conv_last`` under ``strategy``, as JSON-ready values.

    Returns ``(result, summary)``: the ``SweepResult`` and its history and
    masks as lists, to compare workers with one device.
    """
    from tf_backdoor_defense.pruning import prune_to_threshold

    result = prune_to_threshold(model, clean, layers=LAYER, max_accuracy_drop=max_accuracy_drop,
                                poisoned_validation_data=poisoned, strategy=strategy)
    summary = {"history": result.history.to_dict(orient="list"),
               "levels": [[t, int(k)] for t, k in result.levels.items()],
               "masks": [[t, masks[LAYER].tolist()] for t, masks in result.masks.items()]}
    return result, json.loads(json.dumps(summary))


def launch(args):
    from tf_backdoor_defense.experiments._datasets import load_mnist_digits, split
    from tf_backdoor_defense.experiments._models import train_badnet

    x, y = load_mnist_digits()
    train = split(x, y, [2000, 1000, 1000], seed=args.seed)[0]
    clean, poisoned, trigger = _sets(args)
    badnet = train_badnet(*train, trigger, target=0, epochs=args.badnet_epochs, seed=args.seed)
    workdir = tempfile.mkdtemp(prefix="multi_worker_sweep_")
    try:
        weights = os.path.join(workdir, "badnet.weights.h5")
        badnet.save_weights(weights)
        ports = free_ports(args.workers)
        cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
        procs = []
        for index in range(args.workers):
            env = dict(os.environ, TF_CONFIG=json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}))
            command = [sys.executable, os.path.abspath(__file__), "--worker", "--weights", weights,
                       "--out", os.path.join(workdir, f"worker{index}.json"),
                       "--seed", str(args.seed), "--examples", str(args.examples),
                       "--max-accuracy-drop", str(args.max_accuracy_drop)]
            procs.append(subprocess.Popen(command, env=env))
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=args.timeout))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        if max(codes):
            return max(codes)
        _, single = sweep(badnet, clean, poisoned, args.max_accuracy_drop)
        same = all(json.load(open(os.path.join(workdir, f"worker{index}.json"))) == single
                   for index in range(args.workers))
        print(f"every worker's table equals one device's: {same}", flush=True)
        return 0 if same else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def worker(args):
    from tf_backdoor_defense._keras import tf
    from tf_backdoor_defense.experiments._models import mnist_cnn

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    clean, poisoned, _ = _sets(args)
    model = mnist_cnn(seed=args.seed)
    model.load_weights(args.weights)
    result, summary = sweep(model, clean, poisoned, args.max_accuracy_drop, strategy=strategy)
    if task == 0:
        print(result.history.to_string(float_format=lambda v: f"{v:.4f}"), flush=True)
    level = result.levels[args.max_accuracy_drop]
    print(f"worker {task}: {strategy.num_replicas_in_sync} replicas, level {level}: "
          f"{int(result.history['channels_pruned'][level])}/{result.channels[LAYER]} channels "
          f"of {LAYER} pruned", flush=True)
    with open(args.out, "w") as handle:
        json.dump(summary, handle)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help="run as one worker (reads TF_CONFIG)")
    parser.add_argument("--weights", help="BadNet weights (worker mode)")
    parser.add_argument("--out", help="where the worker saves its table (worker mode)")
    parser.add_argument("--examples", type=int, default=1000,
                        help="clean and poisoned validation examples (at most 1000 each)")
    parser.add_argument("--badnet-epochs", type=int, default=8)
    parser.add_argument("--max-accuracy-drop", type=float, default=0.04)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=600)
    args = parser.parse_args(argv)
    return worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    raise SystemExit(main())
