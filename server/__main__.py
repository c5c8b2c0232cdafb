"""`python -m server`: run the bridge; `python -m server calls [CA…]`: read the call records."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["calls"]:
        from server.records.cli import main as calls

        sys.exit(calls(sys.argv[2:]))
    from server.main import main

    main()
