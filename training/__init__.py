"""Demo models trained from scratch on a procedurally generated shapes dataset."""
