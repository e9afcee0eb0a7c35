"""Small datasets: bundled, generated, and readers for files a user downloaded."""
