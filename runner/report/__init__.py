"""What a person reads: the end-of-run summary, plots, explanations, console logging, redaction of secrets."""
