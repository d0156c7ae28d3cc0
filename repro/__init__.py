"""splitrepro harness: run scenarios in fresh interpreters and classify the outcome."""
