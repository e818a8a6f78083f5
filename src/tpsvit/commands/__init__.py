"""The tpsvit sub-commands, one module each (see tpsvit.cli)."""
