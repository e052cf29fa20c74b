"""The dashboard's figures and tables, one module per tab (``app.py`` lays them out)."""
