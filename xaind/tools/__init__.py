"""Command-line tools shipped with xaind."""
