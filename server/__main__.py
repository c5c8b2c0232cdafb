"""`python -m server`: run the bridge; `python -m server calls [CA…]`: read the call records;
`python -m server call +1…` / `campaign FILE.csv`: place a call, start a campaign (through a
running bridge's API)."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["calls"]:
        from server.records.cli import main as calls

        sys.exit(calls(sys.argv[2:]))
    if sys.argv[1:2] in (["call"], ["campaign"]):
        from server.outbound.cli import main as outbound

        sys.exit(outbound(sys.argv[2:], sys.argv[1]))
    from server.main import main

    main()
