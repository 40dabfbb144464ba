"""Generated gRPC code of mouse.action.v1 (scripts/gen_proto.py; do not edit)."""
