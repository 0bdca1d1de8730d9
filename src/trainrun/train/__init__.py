"""Training loop and step executors."""
