"""`python -m server`: run the bridge."""

from server.main import main

if __name__ == "__main__":
    main()
