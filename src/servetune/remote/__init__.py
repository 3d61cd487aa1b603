"""Deploying workers on remote hosts over SSH (worker slots).

ssh.py (the system ssh/scp/rsync as argv lists from asyncio subprocesses), agent.py (the stdlib
script run by the remote's python, fed JSON on stdin), wheelhouse.py (what gets installed, online
or offline), diagnose.py (failure → category + suggestion), tunnel.py (the supervised Redis
tunnel), keys.py (the manager's authorized_keys lines), deploy.py (deploy and restore, step by
step). Imports neither ``servetune.manager`` nor ``servetune.worker``.
"""
