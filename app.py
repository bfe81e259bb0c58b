"""Start the Cellpose-web app: `python app.py [--share] [--auth user:pass | --auth-file users.json]`.

Listens on 127.0.0.1:7860 unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (or --host/--port) say
otherwise. This file is also the entry point of the HuggingFace Space.
"""
import sys

from cellpose_web.ui.app import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
