"""The agent's inspector: every exchange through the tunnel, live in a web page and a JSON API.

capture.py  what crosses one stream, as exchanges and WebSocket messages (sans-I/O, bounded, never raising)
store.py    the newest exchanges within a byte budget; listeners hear what changed
views.py    exchanges as the API shows them; how each body is best shown
diff.py     two responses compared
har.py      HAR 1.2 export
replay.py   a captured request rebuilt, as it was or edited
web.py      the page, the API and the live push (asyncio)
app.py      settings, the taps the agent's bridges carry, replays (asyncio)
"""
