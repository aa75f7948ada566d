import { defineConfig } from "vite";

// Preact's JSX through esbuild (no framework plugin needed); Vitest runs the component tests
// in jsdom.
export default defineConfig({
  esbuild: { jsx: "automatic", jsxImportSource: "preact" },
  build: { target: "es2020", sourcemap: false, assetsInlineLimit: 0 },
  test: { environment: "jsdom", include: ["src/**/*.test.ts", "src/**/*.test.tsx"] },
});
