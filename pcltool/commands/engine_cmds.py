"""(placeholder: commands are registered here)"""
