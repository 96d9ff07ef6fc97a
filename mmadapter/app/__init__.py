"""The mmadapter Gradio app: `python -m app` or `mmadapter serve`."""
