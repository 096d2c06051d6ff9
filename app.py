"""`python app.py [--model ...] [--port 7860] ...`: the swallow-stream server (see --help)."""

from swallow_stream.server.cli import main

if __name__ == "__main__":
    main()
