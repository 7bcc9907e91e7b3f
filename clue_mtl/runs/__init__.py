"""Run folders: their layout and reading one back (`folder`), the resumable checkpoint (`checkpoint`)."""
