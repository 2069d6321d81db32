"""The Streamlit leaderboard dashboard (read-only on the results database)."""
