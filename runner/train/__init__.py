"""Training both frameworks: the trainer protocol and its two implementations, epochs, schedules, evaluation."""
