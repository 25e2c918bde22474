"""pcltool: Peer Collaborative Learning from training to a verified deployment."""

__version__ = "0.1.0"
