"""Tools for trying the bridge without a phone: stand-in, simulator, bench, demo, audio.

The product (everything in `server/` outside this package) never imports from here."""
