"""puregpt: a GPT in pure, dependency-free Python.

    import puregpt
    model = puregpt.train(steps=300)              # the bundled names, in memory
    print(puregpt.generate(model, temperature=0.8))
    print(puregpt.score(model, "emma").loss)

See docs/api.md. The engine's pieces are modules: config, tokenizer, bpe, data, ops, model,
optim, sample, checkpoint, train, parallel, plot, hf, explain, cli.
"""

# Load the module puregpt/train.py before binding the function `train` below: loading a
# submodule sets it as an attribute of the package, which would otherwise replace the function
# the first time the module is imported.
from . import train as _train_module  # noqa: F401  (imported for that side effect)
from . import explain as _explain_module  # noqa: F401  (the same, for puregpt/explain.py)
from .api import (Checkpoint, Score, evaluate, explain, generate, load, save, score, stream,
                  train)
from .config import GPTConfig, TrainConfig

__version__ = "0.1.0"
__all__ = ["Checkpoint", "GPTConfig", "Score", "TrainConfig", "evaluate", "explain", "generate",
           "load", "save", "score", "stream", "train"]
