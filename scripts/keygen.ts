// Prints a new API key: 48 random bytes in base64url, 64 characters (the runbook asks for 64+).
export function newApiKey(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(48));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

if (import.meta.main) console.log(newApiKey());
