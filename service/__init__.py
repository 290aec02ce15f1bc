"""graft: transfer learning as a service."""
