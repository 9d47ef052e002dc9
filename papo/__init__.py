"""PAPO: rewards, advantages and losses over reasoning graphs (see the training issue)."""
