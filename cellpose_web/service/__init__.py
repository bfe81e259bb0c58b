"""What the UI and the CLI share: checked inputs, segmentation with provenance, result files,
background jobs (batch, fine-tune) with persisted status, training sets, a model cache and limits.
No Gradio in here."""
