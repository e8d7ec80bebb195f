"""What the tests share: real processes (processes.py, the one place that starts and stops
them), the transformers reference (reference.py), and builders of models, systems and requests."""
