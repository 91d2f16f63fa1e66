"""Generated stubs for the hingeloss.v1 protobuf package (`make proto` regenerates them)."""
