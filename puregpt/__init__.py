"""puregpt: a GPT in pure, dependency-free Python."""

__version__ = "0.1.0"
