"""The paper's evaluation, the demo, and the real MNIST data they train on.

This subpackage uses the library; the library never imports it."""

from tf_backdoor_defense.experiments._datasets import (  # noqa: F401
    load_mnist_digits,
    split,
)
from tf_backdoor_defense.experiments._demo import (  # noqa: F401
    demo_report,
    run_demo,
)
from tf_backdoor_defense.experiments._models import (  # noqa: F401
    mnist_cnn,
    train_badnet,
)
from tf_backdoor_defense.experiments._paper import (  # noqa: F401
    evaluate_defenses,
    EvaluationResult,
    paper_table_mnist,
    DEFENSES,
)

__all__ = [
    "load_mnist_digits",
    "split",
    "run_demo",
    "demo_report",
    "mnist_cnn",
    "train_badnet",
    "evaluate_defenses",
    "EvaluationResult",
    "paper_table_mnist",
    "DEFENSES",
]
