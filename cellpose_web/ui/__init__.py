"""The browser app (Gradio): app.py builds it, tabs/ holds one module per tab; widgets and callbacks
only, every use case is a call into cellpose_web.workflows (or cellpose_web.service)."""
