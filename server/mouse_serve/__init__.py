"""mouse_serve: the MOUSE action-serving gRPC server."""
