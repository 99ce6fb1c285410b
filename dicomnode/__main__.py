from dicomnode.cli import app

app()
