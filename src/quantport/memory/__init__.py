"""Memory management: keep only the weights being worked on resident."""
