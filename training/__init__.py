"""Training pipeline of the LiverTumorAI networks (see README.md in this folder)."""
