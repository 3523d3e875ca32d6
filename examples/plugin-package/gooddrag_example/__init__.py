"""An example third-party gooddrag plugin package."""
