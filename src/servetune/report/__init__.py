"""Reports of finished studies: a self-contained HTML page with tables and plots."""
