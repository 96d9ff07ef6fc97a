"""`python -m app` from a checkout: the Gradio app, whose code is `mmadapter.app` (also `mmadapter serve`)."""
