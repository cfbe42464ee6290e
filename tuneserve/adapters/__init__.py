"""Per-tenant LoRA adapters: conversion and handling."""
