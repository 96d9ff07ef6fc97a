"""The Gradio app: `service` answers chat turns without any UI, `ui` is the page, `serve` the command
line (`mmadapter serve`, `python -m app`)."""
