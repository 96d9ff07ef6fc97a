"""`python -m app`: the Gradio visual question answering app (the same as `mmadapter serve`)."""

from mmadapter.app.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
